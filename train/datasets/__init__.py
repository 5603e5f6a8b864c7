"""Datasets: one in-memory form, COCO/VOC/YOLO readers and writers, synthetic smears."""
