"""Code generation: sympy printers (printers.py) and the module emitter."""
