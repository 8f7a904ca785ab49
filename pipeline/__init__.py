"""This rank's stage (its layers), how layers are split over stages, and the schedule."""
