// Command snooze-grpc-client is a real gRPC client (grpc-go, default options) for the
// tests: it calls the test app's echo service through the activator, unary or server
// streaming, with raw bytes as messages (no generated code), and prints each reply on
// a line. grpc-go reads the server's SETTINGS before it sends a request, as gRPC's
// clients do; hyper's client does not wait.
//
//	snooze-grpc-client -addr 127.0.0.1:8080 -msg hello             # unary Echo
//	snooze-grpc-client -addr 127.0.0.1:8080 -msg hello -stream     # server streaming
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
)

// rawCodec sends and receives messages as the bytes they are.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("raw codec: %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("raw codec: %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

func main() {
	addr := flag.String("addr", "", "host:port of the service")
	msg := flag.String("msg", "snooze", "the message")
	stream := flag.Bool("stream", false, "call the server-streaming method (Stream) instead of Echo")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline of the call")
	flag.Parse()
	encoding.RegisterCodec(rawCodec{})
	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(2)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	req := []byte(*msg)
	if !*stream {
		var reply []byte
		if err := conn.Invoke(ctx, "/snooze.test.Echo/Echo", &req, &reply); err != nil {
			fmt.Fprintln(os.Stderr, "call:", err)
			os.Exit(1)
		}
		fmt.Println(string(reply))
		return
	}
	desc := &grpc.StreamDesc{StreamName: "Stream", ServerStreams: true}
	s, err := conn.NewStream(ctx, desc, "/snooze.test.Echo/Stream")
	if err == nil {
		err = s.SendMsg(&req)
	}
	if err == nil {
		err = s.CloseSend()
	}
	for err == nil {
		var reply []byte
		if err = s.RecvMsg(&reply); err == nil {
			fmt.Println(string(reply))
		}
	}
	if err != io.EOF {
		fmt.Fprintln(os.Stderr, "stream:", err)
		os.Exit(1)
	}
}
