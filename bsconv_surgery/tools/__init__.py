"""The library side of the compare, analyze and models commands."""
