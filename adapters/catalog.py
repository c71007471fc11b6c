"""The read path: which adapter a name means for a tenant, and what a tenant may see.

Own adapters first, then the built-in `public` tenant's (the server's static adapters). Kept
apart from registration (`adapters.service`) so a gateway that only routes needs no store."""

from __future__ import annotations

from adapters.registry import PUBLIC_TENANT, AdapterVersion, Registry, Tenant, split_pinned


class AdapterCatalog:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.public = registry.ensure_public_tenant()

    def resolve(self, tenant: Tenant, model: str) -> AdapterVersion | None:
        """The adapter `model` names for this tenant (own first, then public), or None."""
        return self.resolve_parsed(tenant, *split_pinned(model))

    def resolve_parsed(
        self, tenant: Tenant, name: str, version: int | None
    ) -> AdapterVersion | None:
        found = self.registry.find_live(tenant, name, version)
        if found is None and tenant.name != PUBLIC_TENANT:
            found = self.registry.find_live(self.public, name, version)
        return found

    def visible(self, tenant: Tenant) -> list[AdapterVersion]:
        """Adapters this tenant may use: its own and the public ones it does not shadow."""
        own = self.registry.list_live(tenant)
        if tenant.name == PUBLIC_TENANT:
            return own
        names = {a.name for a in own}
        return own + [a for a in self.registry.list_live(self.public) if a.name not in names]
