"""villi.ipam"""
