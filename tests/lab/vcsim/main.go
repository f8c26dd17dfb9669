// SPDX-License-Identifier: GPL-3.0-or-later
// Command vcsim-lab serves one govmomi vSphere simulator model over TLS.
//
// It is the lab's stand-in for an ESXi server (-mode esx) or a vCenter (-mode vpx).
// govmomi 0.24 keeps its object registry in a package global, so one process serves
// exactly one endpoint; the lab starts one process per simulated server.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:443", "address:port to serve on (loopback only in the lab)")
	mode := flag.String("mode", "esx", "esx (standalone ESXi, HostAgent) or vpx (vCenter, VirtualCenter)")
	datacenters := flag.Int("datacenters", 1, "vpx: datacenters")
	hosts := flag.Int("hosts", 1, "vpx: standalone hosts per datacenter")
	clusters := flag.Int("clusters", 1, "vpx: clusters per datacenter")
	clusterHosts := flag.Int("cluster-hosts", 3, "vpx: hosts per cluster")
	vms := flag.Int("vms", 2, "VMs per host (esx, standalone vpx hosts) and per cluster (vpx)")
	datastores := flag.Int("datastores", 1, "local datastores")
	delay := flag.Int("delay", 0, "milliseconds added to every SOAP call (stands in for network latency)")
	username := flag.String("username", "", "accepted user (empty: any non-empty user and password)")
	password := flag.String("password", "", "accepted password")
	flag.Parse()

	var model *simulator.Model
	switch *mode {
	case "esx":
		model = simulator.ESX()
	case "vpx":
		model = simulator.VPX()
		model.Datacenter = *datacenters
		model.Host = *hosts
		model.Cluster = *clusters
		model.ClusterHost = *clusterHosts
	default:
		log.Fatalf("vcsim-lab: -mode %q: expected esx or vpx", *mode)
	}
	model.Machine = *vms
	model.Datastore = *datastores
	model.DelayConfig.Delay = *delay

	if err := model.Create(); err != nil {
		log.Fatalf("vcsim-lab: create model: %v", err)
	}
	defer model.Remove()

	model.Service.TLS = new(tls.Config)
	model.Service.Listen = &url.URL{Host: *listen}
	if *username != "" {
		model.Service.Listen.User = url.UserPassword(*username, *password)
	}
	server := model.Service.NewServer()
	defer server.Close()

	// One line on stdout that the lab waits for: the service is listening.
	fmt.Printf("vcsim-lab ready mode=%s address=%s\n", *mode, server.URL.Host)
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}
