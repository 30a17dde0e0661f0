"""villi.lab"""
