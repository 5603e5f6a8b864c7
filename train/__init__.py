"""smearsight.train"""
