import ipaddress

from gateway.client_ip import client_ip

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"))


def test_without_trusted_proxies_the_socket_peer_is_the_client() -> None:
    assert client_ip("203.0.113.9", "1.2.3.4", ()) == "203.0.113.9"


def test_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    assert client_ip("203.0.113.9", "1.2.3.4", PROXIES) == "203.0.113.9"


def test_the_nearest_untrusted_hop_is_the_client_behind_trusted_proxies() -> None:
    assert client_ip("127.0.0.1", "6.6.6.6, 198.51.100.7, 10.1.2.3", PROXIES) == "198.51.100.7"


def test_garbage_in_forwarded_for_falls_back_to_the_peer() -> None:
    assert client_ip("127.0.0.1", "<script>, x", PROXIES) == "127.0.0.1"
