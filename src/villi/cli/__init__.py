"""villi.cli"""
