import gc

from aether_desktop.services.gc_tuning import GEN0_THRESHOLD, tune_gc


def test_raises_gen0_and_keeps_older_generations() -> None:
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        assert tune_gc() == (700, 10, 10)
        assert gc.get_threshold() == (GEN0_THRESHOLD, 10, 10)
    finally:
        gc.set_threshold(*saved)


def test_never_lowers_a_higher_setting() -> None:
    saved = gc.get_threshold()
    try:
        gc.set_threshold(GEN0_THRESHOLD * 2, 5, 7)
        tune_gc()
        assert gc.get_threshold() == (GEN0_THRESHOLD * 2, 5, 7)
    finally:
        gc.set_threshold(*saved)
