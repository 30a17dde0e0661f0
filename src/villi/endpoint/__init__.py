"""villi.endpoint"""
