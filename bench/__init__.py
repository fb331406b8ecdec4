"""The forwarder's benchmark harness (run by hand: ``python bench/run.py``)."""
