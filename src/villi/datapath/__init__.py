"""villi.datapath"""
