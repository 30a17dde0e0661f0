"""villi.agent"""
