"""tandem.prefill_workers"""
