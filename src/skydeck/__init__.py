"""skydeck: AI coding agents behind chat channels, one Trio task per channel."""

__version__ = "0.1.0"
