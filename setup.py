"""The one C extension (metering/_relay.c); everything else is in pyproject.toml.

Optional: without a C compiler the package installs without it and the
relayed answer is metered by the Python reference (gateway.meter).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "metering._relay",
            ["metering/_relay.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
