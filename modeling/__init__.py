"""Model-side code of the pediatric chest X-ray pneumonia triage project.

Image I/O, preprocessing, training and inference.
"""
