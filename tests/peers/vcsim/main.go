// Command vcsim serves govmomi's vSphere simulator (a vCenter model) on a loopback
// address, for thinvisor's vsphere provider tests.
//
// It generates a fresh self-signed TLS certificate, prints one JSON line
// {"url": ..., "fingerprint": ...} on stdout once it is listening (the fingerprint is
// the certificate's SHA-256, "AB:CD:..."), and exits at once on SIGTERM or SIGINT,
// removing the simulator's datastore directories; open connections simply close. The simulator's own log is discarded unless -verbose.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "loopback address and port to serve on")
	username := flag.String("username", "", "the only user name accepted (empty: any)")
	password := flag.String("password", "", "the only password accepted")
	machines := flag.Int("machines", 2, "VMs per standalone host and per cluster")
	verbose := flag.Bool("verbose", false, "keep the simulator's log on stderr")
	flag.Parse()

	host, _, err := net.SplitHostPort(*listen)
	if err != nil || !net.ParseIP(host).IsLoopback() {
		log.Fatalf("listen: %q is not a loopback address and port", *listen)
	}
	cert, err := selfSigned(host)
	if err != nil {
		log.Fatalf("certificate: %v", err)
	}
	if !*verbose {
		log.SetOutput(io.Discard)
	}

	model := simulator.VPX()
	model.Machine = *machines
	if err := model.Create(); err != nil {
		fmt.Fprintf(os.Stderr, "model: %v\n", err)
		os.Exit(1)
	}

	model.Service.Listen = &url.URL{Host: *listen}
	if *username != "" {
		model.Service.Listen.User = url.UserPassword(*username, *password)
	}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	model.Service.NewServer()

	sum := sha256.Sum256(cert.Certificate[0])
	served := *model.Service.Listen
	served.User = nil
	line, _ := json.Marshal(map[string]string{"url": served.String(), "fingerprint": colonHex(sum[:])})
	fmt.Println(string(line))

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
	// Not Server.Close: it would wait for clients' pending WaitForUpdatesEx calls.
	model.Remove()
}

// selfSigned makes a P-256 certificate for host, valid for a day.
func selfSigned(host string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return tls.Certificate{}, err
	}
	template := x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "vcsim"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP(host)},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, &template, &template, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// colonHex formats bytes as upper-case hex pairs joined by colons.
func colonHex(b []byte) string {
	parts := make([]string, len(b))
	for i, c := range b {
		parts[i] = fmt.Sprintf("%02X", c)
	}
	return strings.Join(parts, ":")
}
