from django.urls import path, re_path

from cache_api.apis import CacheEntryApi, CacheEntryBatchGetApi

urlpatterns = [
    path("batch/get", CacheEntryBatchGetApi.as_view(), name="cache-batch-get"),
    # Any remaining path is a key; keys.py decides what is legal (illegal -> 400, not 404).
    re_path(r"^(?P<key>.+)$", CacheEntryApi.as_view(), name="cache-entry"),
]
