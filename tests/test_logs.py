"""drop_log_messages: expected chatter is dropped inside the block, nothing else, nothing after."""
import logging

from moram_bench.logs import drop_log_messages


def test_drops_only_matching_root_records_and_only_inside_the_block(caplog):
    with caplog.at_level(logging.WARNING):
        with drop_log_messages("no weights", "partially"):
            logging.warning("Local config loaded, but no weights found")
            logging.warning("Model initialized partially.")
            logging.warning("something a user must see")
        logging.warning("Model initialized partially.")
    assert [r.getMessage() for r in caplog.records] == ["something a user must see", "Model initialized partially."]


def test_no_warnings_drops_one_category_inside_the_block_only():
    import warnings

    from moram_bench.logs import no_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with no_warnings(FutureWarning):
            warnings.warn("dropped", FutureWarning)
            warnings.warn("kept", UserWarning)
        warnings.warn("kept after", FutureWarning)
    assert [str(w.message) for w in seen] == ["kept", "kept after"]


def test_quiet_transformers_restores_verbosity_and_progress_bars():
    import transformers.utils.logging as hf_logging

    from moram_bench.logs import quiet_transformers

    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        with quiet_transformers():
            assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
        with quiet_transformers(errors_only=False):
            assert hf_logging.get_verbosity() == hf_logging.INFO and not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()
