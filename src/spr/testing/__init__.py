"""Test material that ships with spr, so that ``spr bench`` and users' own tests can use it."""
