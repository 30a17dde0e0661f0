"""villi.testing"""
