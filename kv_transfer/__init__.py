"""tandem.kv_transfer"""
