"""The data plane's routes, with their full paths: the root URLconf lists them first and flat
(no include), so resolving a cache request is one regex and one ResolverMatch below the root."""

from django.urls import path, re_path

from cache_api.apis import (
    CacheEntryApi,
    CacheEntryBatchDeleteApi,
    CacheEntryBatchGetApi,
    CacheEntryBatchSetApi,
    CacheEntryTouchApi,
    CacheKeyListApi,
)

urlpatterns = [
    path("v1/cache", CacheKeyListApi.as_view(), name="cache-key-list"),
    path("v1/cache/batch/get", CacheEntryBatchGetApi.as_view(), name="cache-batch-get"),
    path("v1/cache/batch/set", CacheEntryBatchSetApi.as_view(), name="cache-batch-set"),
    path("v1/cache/batch/delete", CacheEntryBatchDeleteApi.as_view(), name="cache-batch-delete"),
    # Keys have no "/" in them: "<key>/touch" is the touch of <key>.
    re_path(r"^v1/cache/(?P<key>[^/]+)/touch$", CacheEntryTouchApi.as_view(), name="cache-entry-touch"),
    # Any remaining path is a key; keys.py decides what is legal (illegal -> 400, not 404).
    # (?s): a key with a newline in it (a%0Ab) is a key too, and gets its 400.
    re_path(r"^v1/cache/(?P<key>(?s:.+))$", CacheEntryApi.as_view(), name="cache-entry"),
]
