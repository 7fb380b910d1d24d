"""tandem.decode_workers"""
