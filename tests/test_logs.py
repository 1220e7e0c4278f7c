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
