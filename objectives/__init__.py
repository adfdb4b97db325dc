"""The example suites, installed with the package as ``safesearch.objectives`` (see README.md here).

Only data lives here: ``safesearch.suites.default_suite_dirs`` finds this folder through the package, so
``safesearch eval --suite hexphi`` works from any directory and after a non-editable install.
"""
