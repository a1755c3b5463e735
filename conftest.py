"""Root pytest configuration: shared fixtures live in tests/conftest.py; this file holds options
and the garbage collector's setup."""

import gc

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-gpu", action="store_true", default=False, help="run tests marked gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-gpu"):
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; pass --run-gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# The loader calls ``gc.collect()`` twice per model load (``return_freed_memory``), and the engine
# tests load hundreds of models in this process, which holds what no server does: every module the
# suite imports (~360k objects after collection, ~150k more from transformers' lazy imports once a
# test builds an HF model). Each full collection walked them all, 0.1-0.3 s a time (45 of
# test_model.py's 55 s). So each test starts with what is alive frozen (``gc.freeze``: skipped by
# the collector, still freed by reference counting) and a collection walks only what the test made.
# Where a directory of tests ends, its modules' fixtures are gone: everything is unfrozen and
# collected once (0.3 s: 15 directories; once per module, 98 of them, cost ~25 s), so a reference
# cycle they held is freed then, not kept to the end of the session.
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    gc.collect()
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    yield
    if nextitem is None or nextitem.path.parent != item.path.parent:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
