"""smearsight.export"""
