"""villi.identity"""
