"""Generated package (python -m service.api.generate); do not edit."""
