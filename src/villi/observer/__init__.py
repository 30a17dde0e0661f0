"""villi.observer"""
