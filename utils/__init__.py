"""Support modules for the chargpt scripts: one concern per module."""
