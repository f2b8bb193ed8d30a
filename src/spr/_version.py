"""The version of spr, written here and nowhere else.

setuptools reads this assignment when it builds (``[tool.setuptools.dynamic]`` in
pyproject.toml parses it without importing spr), so the wheel's and the sdist's names,
the installed distribution's metadata, ``spr.__version__`` and ``spr --version`` agree.
Keep it a plain string literal: anything else makes setuptools import the package.
"""

__version__ = "0.1.0"
