"""villi.cni"""
