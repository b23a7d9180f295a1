"""Providers: the same verbs (create, list, delete, preempt) for local, GCP and AWS.

Cloud SDKs are imported only when their provider is used.
"""

from __future__ import annotations

from fleet.providers.base import Provider, ProviderContext


def get_provider(context: ProviderContext) -> Provider:
    kind = context.spec.provider
    if kind == "local":
        from fleet.providers.local import LocalProvider

        return LocalProvider(context)
    if kind == "gcp":
        from fleet.providers.gcp import GcpProvider

        return GcpProvider(context)
    if kind == "aws":
        from fleet.providers.aws import AwsProvider

        return AwsProvider(context)
    raise ValueError(f"unknown provider {kind!r}")


__all__ = ["Provider", "ProviderContext", "get_provider"]
