"""villi.service"""
