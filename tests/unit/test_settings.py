from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from config.settings import MODEL_DECLARATION, Settings, listen_addresses


def test_defaults_point_at_local_servers():
    s = Settings(redis_port=7000, primary_port=7001, replica_port=7002)
    assert s.resolved_redis_url == "redis://127.0.0.1:7000/0"
    assert s.resolved_broker_url == s.resolved_redis_url
    # Writes: the primary, else whichever of the two accepts writes (a promoted replica).
    assert s.resolved_database_url == ("postgresql+psycopg://chat@/chat?host=127.0.0.1:7001&host=127.0.0.1:7002"
                                       "&target_session_attrs=read-write")
    assert s.resolved_replica_url == "postgresql+psycopg://chat@127.0.0.1:7002/chat"


def test_explicit_urls_win():
    s = Settings(broker_url="redis://b:1/2", database_url="postgresql+psycopg://p/db", replica_url="postgresql+psycopg://r/db")
    assert (s.resolved_broker_url, s.resolved_database_url, s.resolved_replica_url) == (
        "redis://b:1/2", "postgresql+psycopg://p/db", "postgresql+psycopg://r/db")


def test_queue_is_named_after_the_model():
    assert Settings(model="/models/SmolLM2-135M-Instruct/").queue == "gen.smollm2-135m-instruct"
    assert Settings(model="Qwen/Qwen2.5-7B-Instruct").queue == "gen.qwen2-5-7b-instruct"
    assert Settings(model="x", model_queue="gen.custom").queue == "gen.custom"


def test_the_queue_is_the_name_the_model_folder_declares(tmp_path):
    # A web host knows the model by name only.
    web = Settings(model="SmolLM2-135M-Instruct", models_dir=tmp_path / "none")
    assert web.queue == "gen.smollm2-135m-instruct" and web.model_id == "smollm2-135m-instruct"
    # A worker host's copy of the folder, under any folder name, declares the same name.
    copy = tmp_path / "a-copy-of-it"
    copy.mkdir()
    (copy / MODEL_DECLARATION).write_text(json.dumps({"name": "SmolLM2-135M-Instruct"}))
    worker = Settings(model=str(copy))
    assert worker.model_dir == copy and worker.model_name == "SmolLM2-135M-Instruct" and worker.queue == web.queue
    by_name = Settings(model="a-copy-of-it", models_dir=tmp_path)
    assert by_name.model_dir == copy and by_name.queue == web.queue
    # A folder that declares nothing is known by its name.
    assert Settings(model=str(tmp_path / "Plain_Folder")).queue == "gen.plain-folder"


def test_local_urls_carry_the_passwords_quoted():
    s = Settings(host="10.0.0.5", redis_port=7000, primary_port=7001, replica_port=7002, redis_password="r/p@",
                 db_password="d:p")
    assert s.resolved_broker_url == s.resolved_redis_url == "redis://:r%2Fp%40@10.0.0.5:7000/0"
    assert s.resolved_replica_url == "postgresql+psycopg://chat:d%3Ap@10.0.0.5:7002/chat"
    assert make_url(s.resolved_replica_url).password == "d:p"
    assert make_url(s.resolved_database_url).password == "d:p"


def test_servers_listen_on_the_bind_address_and_loopback():
    assert Settings(host="10.0.0.5").resolved_bind == "10.0.0.5"
    assert Settings(host="10.0.0.5", bind="0.0.0.0").resolved_bind == "0.0.0.0"
    assert listen_addresses("127.0.0.1") == ["127.0.0.1"] and listen_addresses("127.0.0.7") == ["127.0.0.7"]
    assert listen_addresses("0.0.0.0") == ["0.0.0.0"] and listen_addresses("10.0.0.5") == ["127.0.0.1", "10.0.0.5"]


def test_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("CHAT_WEB_PORT", "9123")
    monkeypatch.setenv("CHAT_ALLOWED_ORIGINS", '["https://a.example"]')
    s = Settings()
    assert s.web_port == 9123 and s.allowed_origins == ["https://a.example"]


def test_bad_values_are_refused():
    with pytest.raises(ValidationError):
        Settings(dtype="int3")
    with pytest.raises(ValidationError):
        Settings(max_batch=0)


def test_readme_documents_every_setting():
    from config.settings import ROOT

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`CHAT_{name.upper()}`" not in readme]
    assert missing == []


def test_the_redis_url_defaults_to_the_brokers_so_a_worker_host_needs_only_the_broker():
    joined = Settings(broker_url="redis://:pw@broker.internal:6379/0")
    assert joined.resolved_redis_url == joined.resolved_broker_url == "redis://:pw@broker.internal:6379/0"
    assert Settings(broker_url="amqp://rabbit//").resolved_redis_url == "redis://127.0.0.1:6390/0"
    apart = Settings(broker_url="redis://a:6379/0", redis_url="redis://b:6379/1")
    assert (apart.resolved_broker_url, apart.resolved_redis_url) == ("redis://a:6379/0", "redis://b:6379/1")
    assert Settings().resolved_broker_url == Settings().resolved_redis_url == "redis://127.0.0.1:6390/0"
