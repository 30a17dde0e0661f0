"""villi.kvstore"""
