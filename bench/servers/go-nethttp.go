// Go net/http on the benchmark contract (see bench/README.md), standard library only.
//   GET  /sub        every event published, as an SSE stream
//   POST /pub        the body becomes the data of one event sent to every subscriber; 204
//   GET  /count?n=K  K events "data: <i>", then the response ends
// Usage: go-nethttp [port]   (or PORT=...; 0 picks a free port). Prints "ready <port>".
//
// The broker is the usual Go pattern: one goroutine per subscriber reading a buffered
// channel, the publisher sending the encoded frame to every channel. A full channel makes
// the publisher wait (backpressure, as most Go brokers do) rather than drop events, so a
// publisher is paced by the slowest subscriber. A subscriber writes every event already
// queued before it flushes, so a subscriber that is behind catches up in one write.
// GOMAXPROCS is left at its default: Go may use both cores.
package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
)

type subscriber struct {
	ch   chan []byte
	done chan struct{} // closed when the subscriber's request ends
}

type broker struct {
	mu   sync.RWMutex
	subs map[*subscriber]struct{}
}

func (b *broker) publish(frame []byte) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	for s := range b.subs {
		select {
		case s.ch <- frame:
		case <-s.done: // gone: never block on it
		}
	}
}

func (b *broker) serveSub(w http.ResponseWriter, r *http.Request) {
	flusher := w.(http.Flusher)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	flusher.Flush()

	s := &subscriber{ch: make(chan []byte, 64), done: make(chan struct{})}
	b.mu.Lock()
	b.subs[s] = struct{}{}
	b.mu.Unlock()
	defer func() {
		close(s.done) // first, so a publisher blocked on s.ch moves on and releases the lock
		b.mu.Lock()
		delete(b.subs, s)
		b.mu.Unlock()
	}()

	ctx := r.Context()
	for {
		select {
		case <-ctx.Done():
			return
		case frame := <-s.ch:
			if _, err := w.Write(frame); err != nil {
				return
			}
			for len(s.ch) > 0 { // everything already queued, then one flush
				if _, err := w.Write(<-s.ch); err != nil {
					return
				}
			}
			flusher.Flush()
		}
	}
}

func (b *broker) servePub(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	frame := make([]byte, 0, len(body)+8)
	frame = append(frame, "data: "...)
	frame = append(frame, body...)
	frame = append(frame, "\n\n"...)
	b.publish(frame)
	w.WriteHeader(http.StatusNoContent)
}

func serveCount(w http.ResponseWriter, r *http.Request) {
	n, _ := strconv.Atoi(r.URL.Query().Get("n"))
	flusher := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	for i := 1; i <= n; i++ {
		if _, err := fmt.Fprintf(w, "data: %d\n\n", i); err != nil {
			return
		}
		flusher.Flush()
	}
}

func main() {
	port := os.Getenv("PORT")
	if len(os.Args) > 1 {
		port = os.Args[1]
	}
	if port == "" {
		port = "8080"
	}
	b := &broker{subs: make(map[*subscriber]struct{})}
	mux := http.NewServeMux()
	mux.HandleFunc("/sub", b.serveSub)
	mux.HandleFunc("/pub", b.servePub)
	mux.HandleFunc("/count", serveCount)

	// Go (1.19+) raises the soft descriptor limit to the hard one by itself.
	ln, err := net.Listen("tcp", "127.0.0.1:"+port)
	if err != nil {
		fmt.Fprintln(os.Stderr, "go-nethttp:", err)
		os.Exit(1)
	}
	fmt.Printf("ready %d\n", ln.Addr().(*net.TCPAddr).Port)
	srv := &http.Server{Handler: mux, ErrorLog: nil}
	if err := srv.Serve(ln); err != nil {
		fmt.Fprintln(os.Stderr, "go-nethttp:", err)
		os.Exit(1)
	}
}
