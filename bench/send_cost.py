#!/usr/bin/env python3
"""System CPU of one small WebSocket frame written to a loopback TCP socket: as one buffer with
send() (what ws::direct does) against a two-iovec sendmsg() (header + payload, what it did
before). Three alternating pairs of 200,000 calls; the receiver drains on another thread.

    python3 bench/send_cost.py
"""
import socket, threading, resource, time, os
def drain(c):
    while True:
        d=c.recv(1<<20)
        if not d: break
def run(mode, n=200000):
    l=socket.socket(); l.bind(('127.0.0.1',0)); l.listen(1)
    a=socket.create_connection(l.getsockname()); b,_=l.accept()
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t=threading.Thread(target=drain,args=(b,)); t.start()
    hdr=b'\x82\x28'; payload=os.urandom(40); frame=hdr+payload
    r0=resource.getrusage(resource.RUSAGE_THREAD)
    for i in range(n):
        if mode=='sendmsg': a.sendmsg([hdr,payload])
        else: a.send(frame)
    r1=resource.getrusage(resource.RUSAGE_THREAD)
    a.close(); t.join(); b.close(); l.close()
    print(f"{mode:8} sys {1e6*(r1.ru_stime-r0.ru_stime)/n:.2f} us/call  user {1e6*(r1.ru_utime-r0.ru_utime)/n:.2f}")
for _ in range(3):
    run('sendmsg'); run('send')
