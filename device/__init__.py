"""smearsight.device"""
