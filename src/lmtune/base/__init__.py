"""Building models/base, the one checkpoint every later stage starts from. Nothing here is used
after the base stage, so nothing else makes DVC rebuild the base."""
