"""Fuzzing in the suite: 150 seeded specs (mutated examples and grammar draws, tests/fuzz_specs.py), each
run in a worker with a timeout.  Every spec must end in a module whose torch backend agrees with the
reference backend, or in one located error line; none may hang, raise anything else, or pass check and
fail compile.  benchmarks/fuzz_specs.py runs the long version."""
from __future__ import annotations

import random

import pytest
from fuzz_specs import Runner, draw_specs, grammar_spec, mutate, name_pool

N_SPECS = 150
SEED = 20261205
TIMEOUT_S = 10.0  # a hang, not a slow compile: a case takes 0.01-3 s on a shared 2-core machine


@pytest.fixture(scope="module")
def runner():
    r = Runner(TIMEOUT_S)
    yield r
    r.close()


def test_generator_is_seeded_and_hostile():
    pool = name_pool()
    assert {"class", "sum", "torch", "self"} <= set(pool)
    assert any(len(n) > 1000 for n in pool) and any(not n.isascii() for n in pool)
    assert draw_specs(20, 3, pool) == draw_specs(20, 3, pool)
    rng = random.Random(0)
    assert grammar_spec(rng, pool).startswith("layer ")
    text = "layer A {\n    bias l2\n}\n"
    assert any(mutate(text, random.Random(i), pool) != text for i in range(5))


def test_fuzzed_specs_run_or_fail_at_a_place(runner):
    specs = draw_specs(N_SPECS, SEED, name_pool())
    bad = []
    kinds: dict[str, int] = {}
    for i, text in enumerate(specs):
        outcome = runner.run(text, i)
        kinds[outcome.kind] = kinds.get(outcome.kind, 0) + 1
        if outcome.kind not in ("agree", "located", "nonfinite"):
            bad.append(f"spec {i}: {outcome.kind}: {outcome.detail}\n{text}")
    assert not bad, "\n\n".join(bad[:5])
    assert kinds.get("agree", 0) >= N_SPECS // 10  # the generator must reach the backends, not only errors
