"""villi.operator"""
