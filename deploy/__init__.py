"""smearsight.deploy"""
