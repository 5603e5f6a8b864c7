"""smearsight.runtime"""
