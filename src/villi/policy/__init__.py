"""villi.policy"""
