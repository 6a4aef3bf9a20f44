"""tfdeploy: a Terraform deploy service, event-sourced on PostgreSQL."""

__version__ = "0.1.0"
