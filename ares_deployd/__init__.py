"""ares-deployd: deploy and watch the services of one server through systemd."""

__version__ = "0.1.0"
