"""cuba: controlled untargeted backdoor attacks (CUBA, Wu & Zhang) and the defenses that should catch them."""

__version__ = "0.1.0"
